// Runs one AOTInductor engine package (a `<key>.aoti.pt2` of an astraea engine folder) from
// C++, with no Python: the engine's inputs (weights, transformer inputs, block state, in the
// manifest's order) are read as raw little-endian files listed in <inputs>/inputs.txt, one
// "file dtype ndim d0 d1 ..." a line; output 0 is written raw to <out>. The block state is
// updated in place in the input tensors, as the Python runtime relies on.
//   run_package ENGINE.aoti.pt2 INPUTS_DIR OUT_FILE
#include <torch/torch.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

static torch::Dtype dtype_of(const std::string& name) {
  if (name == "float32") return torch::kFloat32;
  if (name == "bfloat16") return torch::kBFloat16;
  if (name == "float16") return torch::kFloat16;
  if (name == "int32") return torch::kInt32;
  if (name == "int64") return torch::kInt64;
  throw std::runtime_error("unknown dtype " + name);
}

int main(int argc, char** argv) {
  if (argc != 4) {
    std::cerr << "usage: run_package ENGINE.aoti.pt2 INPUTS_DIR OUT_FILE\n";
    return 2;
  }
  try {
    std::string dir = argv[2];
    std::ifstream list(dir + "/inputs.txt");
    std::vector<torch::Tensor> inputs;
    std::string line;
    while (std::getline(list, line)) {
      std::istringstream fields(line);
      std::string file, dtype;
      int64_t ndim;
      fields >> file >> dtype >> ndim;
      std::vector<int64_t> shape(ndim);
      for (auto& d : shape) fields >> d;
      auto t = torch::empty(shape, torch::TensorOptions().dtype(dtype_of(dtype)));
      std::ifstream raw(dir + "/" + file, std::ios::binary);
      raw.read(static_cast<char*>(t.data_ptr()), t.numel() * t.element_size());
      if (!raw) throw std::runtime_error("short read: " + file);
      inputs.push_back(t);
    }
    torch::inductor::AOTIModelPackageLoader loader(argv[1]);
    auto outputs = loader.run(inputs);
    auto out = outputs.at(0).contiguous().cpu();
    std::ofstream sink(argv[3], std::ios::binary);
    sink.write(static_cast<const char*>(out.data_ptr()), out.numel() * out.element_size());
    std::cout << "output " << out.sizes() << " from " << inputs.size() << " inputs\n";
  } catch (const std::exception& e) {
    std::cerr << "run_package: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
