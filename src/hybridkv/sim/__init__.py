"""The simulator: seeded workloads run through the real scheduler and manager (bookkeeping
only), a roofline cost model for step time, and the single-request baseline planner.

``simulate(spec, make_workload(WorkloadSpec(...)), CostModel(layout, GPUS["h100"], 8e9))``.
"""

from hybridkv.sim.baseline import PLANNERS, single_request_plan
from hybridkv.sim.cost import GPUS, CostModel, GpuSpec, LiveKvBytes, StepCost
from hybridkv.sim.result import Occupancy, SimResult
from hybridkv.sim.simulator import SimConfig, SimProgress, Simulator, simulate
from hybridkv.sim.workloads import WORKLOADS, Session, Turn, Workload, WorkloadSpec, make_workload

__all__ = [
    "GPUS", "PLANNERS", "WORKLOADS",
    "CostModel", "GpuSpec", "LiveKvBytes", "Occupancy", "Session", "SimConfig", "SimProgress", "SimResult",
    "Simulator", "StepCost", "Turn", "Workload", "WorkloadSpec",
    "make_workload", "simulate", "single_request_plan",
]
