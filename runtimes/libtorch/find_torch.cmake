# find_package(Torch) for the HAM libtorch builds: with CMAKE_PREFIX_PATH or Torch_DIR as given, else in the torch
# wheel of Python_EXECUTABLE (torch.utils.cmake_prefix_path). Sets TORCH_LIB_DIR, the folder of libtorch*.so.
include_guard(GLOBAL)

find_package(Torch QUIET)
if(NOT Torch_FOUND)
  find_package(Python COMPONENTS Interpreter REQUIRED)
  # find_spec locates torch without importing it (an import takes seconds).
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -c
      "import importlib.util as u, os; print(os.path.join(os.path.dirname(u.find_spec('torch').origin), 'share', 'cmake'))"
    OUTPUT_VARIABLE _ham_torch_prefix OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE _rc)
  if(NOT _rc EQUAL 0 OR NOT EXISTS "${_ham_torch_prefix}/Torch/TorchConfig.cmake")
    message(FATAL_ERROR "${Python_EXECUTABLE} has no torch wheel with CMake files (pip install torch), and "
                        "find_package(Torch) found none; pass -DPython_EXECUTABLE=<venv>/bin/python or "
                        "-DCMAKE_PREFIX_PATH=$(python -c 'import torch; print(torch.utils.cmake_prefix_path)')")
  endif()
  list(APPEND CMAKE_PREFIX_PATH "${_ham_torch_prefix}")
  find_package(Torch REQUIRED)
endif()
get_filename_component(TORCH_LIB_DIR "${TORCH_LIBRARY}" DIRECTORY)
message(STATUS "libtorch ${Torch_VERSION}: ${TORCH_LIB_DIR}")
