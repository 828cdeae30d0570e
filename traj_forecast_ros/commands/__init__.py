"""Subcommands of the ``traj-forecast`` CLI. Each module defines ``register(subparsers)``."""

# Modules listed here are imported lazily by traj_forecast_ros.cli; a missing one is skipped with a note.
COMMAND_MODULES = (
    "traj_forecast_ros.commands.predict",
    "traj_forecast_ros.commands.models",  # download, info, export
    "traj_forecast_ros.commands.data",  # generate synthetic data
    "traj_forecast_ros.commands.train",  # train-vae, train-flow, train-regressor
    "traj_forecast_ros.commands.evaluate",
    "traj_forecast_ros.commands.bag",  # bag play / run / record / make-sample
)
