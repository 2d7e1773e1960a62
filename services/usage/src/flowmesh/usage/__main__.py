"""``python -m flowmesh.usage``."""

from flowmesh.runtime.service import main
from flowmesh.usage.app import create_app
from flowmesh.usage.settings import UsageSettings

if __name__ == "__main__":
    main(lambda: create_app(UsageSettings()))
