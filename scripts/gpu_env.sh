# Sourced by the scripts run on a lent GPU machine, from the project root: installs the wheels its
# image lacks (carried in .whl/, see ../shared/gpu/README.md) once into /tmp/site and puts them and
# the project on PYTHONPATH. Then installs the project itself (editable, no dependencies), where
# `transfiner` does not import yet: model/, export/ and service/ become transfiner.model,
# transfiner.export and transfiner.service only through the installed package's mapping, so the
# project on the path is not enough. A no-op on a machine with the project installed.
if [ -d .whl ] && [ ! -e /tmp/site/.installed ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 | tail -2 \
        && [ -d /tmp/site ] && touch /tmp/site/.installed
fi
if [ -d /tmp/site ]; then
    export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}
if ! python3 -c "import transfiner.model" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>&1 | tail -2
fi
