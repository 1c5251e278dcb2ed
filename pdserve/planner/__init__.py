"""Cost model, discrete-event simulator and planner: should this workload be disaggregated, and how."""
