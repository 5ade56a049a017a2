# Sourced by gpu-check.sh and trt-check.sh: make the source tree importable as the package installs, with no pip
# install (a GPU machine may have no network): the package maps kernels/ to ham_export.kernels and plugins_trt/ to
# ham_export.plugins_trt; two symlinks inside ham_export/ (git-ignored) do the same here, whatever comes first on
# sys.path (the current folder, pytest's rootdir, PYTHONPATH), and the tree goes first on PYTHONPATH.
for part in kernels plugins_trt; do
    [ -e "ham_export/$part" ] || ln -s "../$part" "ham_export/$part"
done
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
