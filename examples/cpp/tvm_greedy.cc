// Greedy decoding with a ham-export TVM artifact (prefill.so, decode.so, ham_export.json), from C++.
//
//   tvm_greedy DIR PROMPT STEPS
//
// Loads the two Relax VM libraries with the tvm-ffi runtime (libtvm_ffi.so + libtvm_runtime.so from the
// apache-tvm wheel), prefills the UTF-8 bytes of PROMPT as one sequence, then picks the most likely token STEPS
// times (the first from the prefill's last position, each later one from a decode step) and prints the STEPS token
// ids on one line. The thresholds are read from the manifest's "thresholds" array. CPU (llvm) artifacts only.
//
// Exit codes: 0 ok, 2 bad arguments or manifest, 1 a TVM error.

#include <dlpack/dlpack.h>
#include <tvm/ffi/any.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "greedy_common.h"

namespace ffi = tvm::ffi;

namespace {

using greedy::UsageError;

// Host memory for tensors made here (64-byte aligned, as TVM's kernels prefer).
struct HostAlloc {
  void AllocData(DLTensor* t) {
    size_t bytes = ffi::GetDataSize(*t);
    size_t rounded = (bytes + 63) / 64 * 64;
    t->data = std::aligned_alloc(64, rounded == 0 ? 64 : rounded);
    if (t->data == nullptr) throw std::bad_alloc();
  }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

constexpr DLDevice kCpu{kDLCPU, 0};
constexpr DLDataType kInt64{kDLInt, 64, 1};
constexpr DLDataType kFloat32{kDLFloat, 32, 1};

ffi::Tensor HostTensor(std::vector<int64_t> shape, DLDataType dtype, const void* src) {
  ffi::Tensor t = ffi::Tensor::FromNDAlloc(HostAlloc(), ffi::ShapeView(shape.data(), shape.size()), dtype, kCpu);
  std::memcpy(t.data_ptr(), src, ffi::GetDataSize(*t.GetDLTensorPtr()));
  return t;
}

// A Relax VM for one compiled library (the VM module, which owns the executable, and its "main").
struct Program {
  ffi::Module vm;
  ffi::Function main;
};

// Loads the library into a VM on the CPU with the pooled allocator, as tvm.relax.VirtualMachine(lib, tvm.cpu()).
Program Load(const std::string& path) {
  ffi::Module lib = ffi::Module::LoadFromFile(path);
  ffi::Optional<ffi::Function> load = lib->GetFunction("vm_load_executable");
  if (!load.has_value()) throw UsageError(path + " is not a Relax VM library (no vm_load_executable)");
  ffi::Module vm = (*load)().cast<ffi::Module>();
  // Arguments per device: DLPack device type, index, allocator (1 naive, 2 pooled); the CPU is the only one.
  constexpr int kPooled = 2;
  vm->GetFunction("vm_initialization").value()(static_cast<int>(kDLCPU), 0, kPooled);
  ffi::Optional<ffi::Function> main = vm->GetFunction("main");
  if (!main.has_value()) throw UsageError(path + " has no function main");
  return Program{vm, *main};
}

// The last position's logits of a [1, T, V] or [1, V] float32 tensor -> its argmax.
int64_t LastArgMax(const ffi::Tensor& logits) {
  const DLTensor* t = logits.GetDLTensorPtr();
  if (t->device.device_type != kDLCPU || t->dtype.code != kDLFloat || t->dtype.bits != 32 || t->ndim < 2) {
    throw std::runtime_error("logits must be a float32 CPU tensor [1, ..., V]");
  }
  int64_t vocab = t->shape[t->ndim - 1];
  int64_t rows = logits.numel() / vocab;
  const float* data = static_cast<const float*>(logits.data_ptr());
  return greedy::ArgMax(data + (rows - 1) * vocab, vocab);
}

// What a program returned is what the manifest describes (the libraries carry no signature to read, so their
// outputs are checked, as ham_export's TVM runner probes them): logits, scores, routed, overflow, then 6 state tensors
// a layer whose caches hold the manifest's capacity.
void CheckOutputs(const greedy::Manifest& m, const ffi::Array<ffi::Any>& outputs, const char* program) {
  constexpr int64_t kHead = 4, kFields = 6;
  if (static_cast<int64_t>(outputs.size()) != kHead + kFields * m.n_layers) {
    throw UsageError(std::string(program) + ".so returned " + std::to_string(outputs.size()) + " outputs; " + m.path +
                     " describes " + std::to_string(kHead + kFields * m.n_layers));
  }
  for (int64_t layer = 0; layer < m.n_layers; ++layer) {
    const ffi::Tensor k_cache = outputs[kHead + kFields * layer + 2].cast<ffi::Tensor>();
    const DLTensor* t = k_cache.GetDLTensorPtr();
    if (t->ndim != 4 || t->shape[2] != m.capacity) {
      throw UsageError(std::string(program) + ".so holds caches of another capacity than " + m.path + "'s " +
                       std::to_string(m.capacity));
    }
  }
}

int Run(int argc, char** argv) {
  if (argc != 4) throw UsageError("usage: tvm_greedy DIR PROMPT STEPS");
  std::string dir = argv[1];
  greedy::Request request = greedy::ParseRequest(argv[2], argv[3]);

  const greedy::Manifest manifest = greedy::ReadManifest(dir + "/ham_export.json", "tvm");
  greedy::CheckPromptVocabulary(manifest, request.prompt);
  const std::vector<float>& thresholds = manifest.thresholds;
  Program prefill_program = Load(dir + "/prefill.so");
  Program decode_program = Load(dir + "/decode.so");
  const ffi::Function& prefill = prefill_program.main;
  const ffi::Function& decode = decode_program.main;

  std::vector<int64_t> ids = greedy::ByteTokens(request.prompt);
  ffi::Tensor tokens = HostTensor({1, static_cast<int64_t>(ids.size())}, kInt64, ids.data());
  ffi::Tensor thr = HostTensor({static_cast<int64_t>(thresholds.size())}, kFloat32, thresholds.data());

  // Outputs: logits, scores, routed, overflow, then the state (6 tensors a layer) that decode takes back.
  constexpr size_t kHead = 4;
  auto outputs = prefill(tokens, thr).cast<ffi::Array<ffi::Any>>();
  CheckOutputs(manifest, outputs, "prefill");

  greedy::PrintTokens(greedy::Pick(request.steps, LastArgMax(outputs[0].cast<ffi::Tensor>()), [&](int64_t token) {
    // decode(token, thresholds, *state): the caches of the state are updated in place and returned again.
    // Array::operator[] returns by value: hold the state elements while the views point at them.
    std::vector<ffi::Any> state(outputs.begin() + kHead, outputs.end());
    ffi::Tensor token_t = HostTensor({1}, kInt64, &token);
    std::vector<ffi::AnyView> args{token_t, thr};
    for (const ffi::Any& s : state) args.push_back(s);
    ffi::Any result;
    decode.CallPacked(args.data(), static_cast<int32_t>(args.size()), &result);
    outputs = result.cast<ffi::Array<ffi::Any>>();
    CheckOutputs(manifest, outputs, "decode");
    return LastArgMax(outputs[0].cast<ffi::Tensor>());
  }));
  return 0;
}

}  // namespace

// ffi::Error derives from std::exception: a TVM error is reported with exit code 1.
int main(int argc, char** argv) { return greedy::Main("tvm_greedy", Run, argc, argv); }
