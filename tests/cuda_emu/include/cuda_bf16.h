// bfloat16 of the CUDA host emulation: see cuda_fp16.h (both types live there).
#pragma once
#include <cuda_fp16.h>
