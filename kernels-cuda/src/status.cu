// Names of the status codes the launch functions return.
#include "common.cuh"

extern "C" const char* foveal_status_string(int status) {
  if (status == FOVEAL_ERR_UNSUPPORTED) return "foveal: configuration not supported by the compiled kernels";
  if (status == FOVEAL_ERR_SHARED_MEMORY) {
    return "foveal: a kernel needs more shared memory per block (static plus dynamic) than the device allows";
  }
  return cudaGetErrorString(static_cast<cudaError_t>(status));
}
