"""``python -m flowmesh.scheduler``."""

from flowmesh.runtime.service import main
from flowmesh.scheduler.app import create_app
from flowmesh.scheduler.settings import SchedulerSettings

if __name__ == "__main__":
    main(lambda: create_app(SchedulerSettings()))
