"""``python -m flowmesh.flows``."""

from flowmesh.flows.app import create_app
from flowmesh.flows.settings import FlowsSettings
from flowmesh.runtime.service import main

if __name__ == "__main__":
    main(lambda: create_app(FlowsSettings()))
