// Greedy decoding with a ham-export AOTInductor package (model.pt2 + ham_export.json), from C++ with libtorch.
//
//   aoti_greedy [--ops LIB] PACKAGE PROMPT STEPS
//
// PACKAGE is the model.pt2 written by ham-export native (or the folder holding it). The compiled
// code calls the ham ops through the dispatcher, so the op library libham_torch_ops.so (runtimes/libtorch) is
// dlopen'ed first: LIB, or the one next to this executable. Then the package's "prefill" and "decode" models are
// loaded with torch::inductor::AOTIModelPackageLoader, the UTF-8 bytes of PROMPT are prefilled as one sequence, and
// the most likely token is picked STEPS times (the first from the prefill's last position, each later one from a
// decode step); the STEPS token ids are printed on one line. The manifest is read with nlohmann/json and checked
// (types, one finite threshold per layer, shapes that agree with the capacity), and each model's signature compiled
// into the package must equal the inputs and outputs the manifest lists for it. CPU packages only.
//
// Exit codes: 0 ok, 2 bad arguments, manifest or op library, 1 a libtorch error.

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <c10/core/InferenceMode.h>
#include <c10/util/Exception.h>
#include <dlfcn.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "greedy_common.h"

namespace {

constexpr const char* kOpLibrary = "libham_torch_ops.so";
constexpr const char* kOps[] = {"ham::cache_attention", "ham::cache_append", "ham::gdn_prefill"};

using greedy::UsageError;

using greedy::ExecutableDir;
using greedy::IsDir;
using greedy::IsFile;
using greedy::Parent;

// Checks that the manifest describes a CPU AOTInductor package; returns it, checked (greedy::ReadManifest).
greedy::Manifest ReadManifest(const std::string& manifest_path) {
  if (!IsFile(manifest_path)) {
    throw UsageError("no manifest at " + manifest_path + " (ham_export.json belongs beside the package)");
  }
  greedy::Manifest m = greedy::ReadManifest(manifest_path, "aotinductor");
  std::string device = m.String("device");
  if (!device.empty() && device != "cpu") {
    throw UsageError(manifest_path + ": the package was compiled for '" + device + "'; this program runs CPU ones");
  }
  return m;
}

// The signature compiled into a model of the package (metadata "ham.signature", written by ham-export native) equals
// the inputs and outputs the manifest lists for it, as ham_export.backends.aotinductor checks on load.
void CheckSignature(const greedy::Manifest& m, torch::inductor::AOTIModelPackageLoader& loader,
                    const std::string& program) {
  auto metadata = loader.get_metadata();
  auto it = metadata.find("ham.signature");
  if (it == metadata.end()) {
    throw UsageError("the " + program + " model records no signature (ham.signature); build the package again");
  }
  nlohmann::json recorded = nlohmann::json::parse(it->second, nullptr, /*allow_exceptions=*/false);
  nlohmann::json listed = nlohmann::json::object();
  for (const char* kind : {"inputs", "outputs"}) {
    nlohmann::json rows = nlohmann::json::array();
    for (const auto& t : m.data["programs"][program][kind])
      rows.push_back({t.value("name", ""), t.value("dtype", ""), t.value("shape", nlohmann::json())});
    listed[kind] = rows;
  }
  if (recorded != listed) {
    throw UsageError("the " + program + " model of the package is not the one " + m.path + " describes (capacity " +
                     std::to_string(m.capacity) + ", dtype " + m.dtype + ", " + std::to_string(m.n_layers) +
                     " layers)");
  }
}

// dlopens the op library and checks that it registered the ham ops with the dispatcher.
void LoadOpLibrary(const std::string& path) {
  if (!IsFile(path)) {
    throw UsageError("op library not found at " + path +
                     "; build it with bash scripts/build-torch-ops.sh (or the examples/cpp/aoti CMake project, which "
                     "puts it next to aoti_greedy) or pass --ops LIB");
  }
  // Its static initializers register the ops; the handle is never closed, so they stay registered.
  if (dlopen(path.c_str(), RTLD_NOW) == nullptr) {
    const char* error = dlerror();
    throw UsageError("cannot load the op library " + path + ": " + (error ? error : "unknown dlopen error"));
  }
  for (const char* op : kOps) {
    if (!c10::Dispatcher::singleton().findSchema({op, ""}).has_value()) {
      throw UsageError(path + " does not define " + op + "; it is not the HAM op library " + kOpLibrary);
    }
  }
}

at::Tensor HostTensor(std::vector<int64_t> shape, at::ScalarType dtype, const void* src) {
  at::Tensor t = at::empty(shape, at::TensorOptions().dtype(dtype));
  std::memcpy(t.data_ptr(), src, t.nbytes());
  return t;
}

// The last position's logits of a [1, T, V] or [1, V] float32 tensor -> its argmax.
int64_t LastArgMax(const at::Tensor& logits_in) {
  if (!logits_in.device().is_cpu() || logits_in.scalar_type() != at::kFloat || logits_in.dim() < 2) {
    throw std::runtime_error("logits must be a float32 CPU tensor [1, ..., V]");
  }
  at::Tensor logits = logits_in.contiguous();
  int64_t vocab = logits.size(-1);
  int64_t rows = logits.numel() / vocab;
  return greedy::ArgMax(logits.const_data_ptr<float>() + (rows - 1) * vocab, vocab);
}

int Run(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  std::string ops = ExecutableDir() + "/" + kOpLibrary;
  if (args.size() >= 2 && args[0] == "--ops") {
    ops = args[1];
    args.erase(args.begin(), args.begin() + 2);
  }
  if (args.size() != 3) throw UsageError("usage: aoti_greedy [--ops LIB] PACKAGE PROMPT STEPS");
  std::string package = args[0];
  greedy::Request request = greedy::ParseRequest(args[1], args[2]);
  if (IsDir(package)) package += "/model.pt2";
  if (!IsFile(package)) throw UsageError("no package at " + package);

  greedy::Manifest manifest = ReadManifest(Parent(package) + "/ham_export.json");
  greedy::CheckPromptVocabulary(manifest, request.prompt);
  const std::vector<float>& thresholds = manifest.thresholds;
  LoadOpLibrary(ops);
  c10::InferenceMode inference;
  torch::inductor::AOTIModelPackageLoader prefill(package, "prefill");
  torch::inductor::AOTIModelPackageLoader decode(package, "decode");
  CheckSignature(manifest, prefill, "prefill");
  CheckSignature(manifest, decode, "decode");

  std::vector<int64_t> ids = greedy::ByteTokens(request.prompt);
  at::Tensor tokens = HostTensor({1, static_cast<int64_t>(ids.size())}, at::kLong, ids.data());
  at::Tensor thr = HostTensor({static_cast<int64_t>(thresholds.size())}, at::kFloat, thresholds.data());

  // Outputs: logits, scores, routed, overflow, then the state (6 tensors a layer) that decode takes back.
  constexpr size_t kHead = 4;
  std::vector<at::Tensor> outputs = prefill.run({tokens, thr});
  if (outputs.size() <= kHead) throw std::runtime_error("prefill returned too few outputs");

  greedy::PrintTokens(greedy::Pick(request.steps, LastArgMax(outputs[0]), [&](int64_t token) {
    // decode(token, thresholds, *state): the compiled code reads its inputs with the contiguous strides it was
    // compiled for, without checking them, so every input is made contiguous.
    std::vector<at::Tensor> inputs{HostTensor({1}, at::kLong, &token), thr};
    for (size_t i = kHead; i < outputs.size(); ++i) inputs.push_back(outputs[i].contiguous());
    outputs = decode.run(inputs);
    if (outputs.size() <= kHead) throw std::runtime_error("decode returned too few outputs");
    return LastArgMax(outputs[0]);
  }));
  return 0;
}

// An error's message; a libtorch one's without its C++ backtrace.
const char* Message(const std::exception& e) {
  const auto* error = dynamic_cast<const c10::Error*>(&e);
  return error ? error->what_without_backtrace() : e.what();
}

}  // namespace

int main(int argc, char** argv) { return greedy::Main("aoti_greedy", Run, argc, argv, Message); }
