#!/usr/bin/env bash
# Builds a real llama.cpp (shared libllama + a few tools) and installs its Python bindings
# (llama-cpp-python) on top of that build, from PyPI alone: the llama-cpp-python source release
# carries llama.cpp's source tree. About 5 minutes on 2 idle cores; a rerun with the same PREFIX
# and version returns at once.
#     scripts/check/llama_cpp.sh [PREFIX]     (default: target/llama-cpp)
# Then: PREFIX/venv/bin/python with LLAMA_CPP_LIB_PATH=PREFIX/build/bin, tools in PREFIX/build/bin.
# Built for AVX2 rather than -march=native: on CPUs with AMX (Sapphire Rapids), a native build
# takes llama.cpp's AMX matrix product for the Q8_0 and Q4 files, which crashed (SIGSEGV in
# ggml_backend_amx_mul_mat) on this checker's tiny model.
set -euo pipefail
version=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}   # vendors llama.cpp 0c1e570
prefix=$(realpath -m "${1:-target/llama-cpp}")
stamp="$prefix/.built-$version-avx2"
mkdir -p "$prefix"
if [ ! -f "$stamp" ]; then
    python3 -m venv "$prefix/venv"
    "$prefix/venv/bin/pip" install -q cmake ninja numpy "gguf==0.19.0"
    "$prefix/venv/bin/pip" download -q --no-deps --no-binary llama-cpp-python \
        "llama-cpp-python==$version" -d "$prefix/dl"
    tar -xzf "$prefix/dl/llama_cpp_python-$version.tar.gz" -C "$prefix"
    src="$prefix/llama_cpp_python-$version/vendor/llama.cpp"
    export PATH="$prefix/venv/bin:$PATH"
    cmake -S "$src" -B "$prefix/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
        -DBUILD_SHARED_LIBS=ON -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON \
        -DGGML_F16C=ON -DGGML_BMI2=ON -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_UI=OFF \
        -DLLAMA_USE_PREBUILT_UI=OFF >"$prefix/configure.log"
    cmake --build "$prefix/build" -j "$(nproc)" --target llama llama-tokenize llama-quantize \
        >"$prefix/build.log"
    # The bindings load $LLAMA_CPP_LIB_PATH/libllama.so instead of compiling llama.cpp again.
    CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" "$prefix/venv/bin/pip" install -q \
        --no-cache-dir "$prefix/dl/llama_cpp_python-$version.tar.gz"
    touch "$stamp"
fi
echo "$prefix"
