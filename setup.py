"""ament_python package traj_forecast_ros (also pip-installable for the ROS-free core)."""

from glob import glob
from os.path import isdir, isfile

from setuptools import find_packages, setup

PACKAGE = "traj_forecast_ros"
SHIPPED_MODELS = ("demo-blocks", "sim-manipulation")  # model directories in models/ (installed when present)
SAMPLE_BAGS = ("libero_two_views", "sim_heldout")


def folder_data_files(root: str) -> list:
    """``(share/<package>/<folder>, files)`` for ``root`` and each of its subfolders (one level), when present."""
    entries = [(f"share/{PACKAGE}/{root}", [f for f in sorted(glob(f"{root}/*")) if isfile(f)])]
    entries += [(f"share/{PACKAGE}/{sub}", sorted(glob(f"{sub}/*"))) for sub in sorted(glob(f"{root}/*")) if isdir(sub)]
    return [(target, files) for target, files in entries if files]


setup(
    name=PACKAGE,
    version="0.1.0",
    packages=find_packages(include=[PACKAGE, f"{PACKAGE}.*"]),
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/launch", glob("launch/*.py")),
        (f"share/{PACKAGE}/config", glob("config/*")),
        (f"share/{PACKAGE}/rviz", glob("rviz/*.rviz")),
        (f"share/{PACKAGE}/models", glob("models/*.yaml")),
        (f"share/{PACKAGE}/data/sample_bag", ["data/sample_bag/README.md"]),
    ] + [entry for name in SHIPPED_MODELS for entry in folder_data_files(f"models/{name}")]
      + [entry for name in SAMPLE_BAGS for entry in folder_data_files(f"data/sample_bag/{name}")],
    package_data={PACKAGE: ["py.typed"]},
    install_requires=["setuptools"],
    # No `sim` extra: robosuite 1.5.2 pins mink==0.0.5 (numpy<2), which cannot resolve beside this project's
    # numpy 2 pin. The simulated manipulation generator (traj-forecast data sim-manipulation) is installed by
    # `bash scripts/setup_sim.sh` (robosuite with --no-deps plus the pinned requirements-sim.txt):
    # docs/sim-manipulation.md, "Install".
    zip_safe=True,
    maintainer="traj_forecast_ros maintainers",
    maintainer_email="maintainers@traj-forecast.invalid",
    description="Dense point-trajectory forecasting (What Happens Next?) as a ROS 2 perception node.",
    license="Apache-2.0",
    tests_require=["pytest"],
    entry_points={
        "console_scripts": [
            "traj-forecast = traj_forecast_ros.cli:main",
            "forecast_node = traj_forecast_ros.ros.forecast_node:main",
            "forecast_recorder = traj_forecast_ros.bag.recorder:main",
            "example_planner = traj_forecast_ros.ros.example_planner:main",
        ],
    },
)
