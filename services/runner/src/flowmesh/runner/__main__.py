"""``python -m flowmesh.runner``."""

from flowmesh.runner.app import create_app
from flowmesh.runner.settings import RunnerSettings
from flowmesh.runtime.service import main

if __name__ == "__main__":
    main(lambda: create_app(RunnerSettings()))
