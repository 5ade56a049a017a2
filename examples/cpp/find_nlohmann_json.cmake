# nlohmann/json, the header-only JSON library the examples read ham_export.json with: an installed CMake package
# (Debian's nlohmann-json3-dev), else the headers of the nlohmann-json pip package (a ham-export dev extra) found with
# Python_EXECUTABLE. Defines the target nlohmann_json::nlohmann_json.
find_package(nlohmann_json 3.11 QUIET)
if(NOT nlohmann_json_FOUND)
  find_package(Python COMPONENTS Interpreter REQUIRED)
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -c
      "import importlib.util as u, os; print(os.path.join(os.path.dirname(u.find_spec('nlohmann_json').origin), 'include'))"
    OUTPUT_VARIABLE _nlohmann_include OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE _rc ERROR_QUIET)
  if(NOT _rc EQUAL 0 OR NOT EXISTS "${_nlohmann_include}/nlohmann/json.hpp")
    message(FATAL_ERROR "nlohmann/json not found: install nlohmann-json3-dev, or pip install nlohmann-json into "
                        "${Python_EXECUTABLE}'s environment")
  endif()
  add_library(nlohmann_json::nlohmann_json INTERFACE IMPORTED)
  set_target_properties(nlohmann_json::nlohmann_json PROPERTIES INTERFACE_INCLUDE_DIRECTORIES "${_nlohmann_include}")
  message(STATUS "nlohmann/json: ${_nlohmann_include}")
endif()
