# Sourced by the scripts run on a lent GPU machine: installs the wheels its image lacks (carried
# in .whl/, see ../shared/gpu/README.md) once into /tmp/site and puts them and the project on
# PYTHONPATH. A no-op where there is no .whl/ (a machine with the project installed).
if [ -d .whl ] && [ ! -e /tmp/site/.installed ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 | tail -2 \
        && [ -d /tmp/site ] && touch /tmp/site/.installed
fi
if [ -d /tmp/site ]; then
    export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}
