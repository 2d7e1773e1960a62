#!/bin/sh
# The image's entry point: `python -m flowmesh.$FLOWMESH_SERVICE`, with any arguments passed on
# (`check`, `migrate`). The service name is fixed at build time (ARG SERVICE -> ENV), which the exec
# form of ENTRYPOINT cannot expand itself; exec keeps Python as PID 1 so it receives SIGTERM.
set -eu
exec python -m "flowmesh.${FLOWMESH_SERVICE:?FLOWMESH_SERVICE is not set}" "$@"
