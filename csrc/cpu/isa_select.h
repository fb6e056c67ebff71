#pragma once
#include <string>
#include <vector>

#include "kernels.h"

namespace metaembed {
namespace cpu {

const IsaKernels* active_kernels();
std::vector<std::string> supported_isas();
// Returns false (and changes nothing) if `name` is unknown or unsupported on this CPU.
bool set_active_isa(const char* name);

}  // namespace cpu
}  // namespace metaembed
