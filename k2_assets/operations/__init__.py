"""operations domain: assets, checks, jobs and schedules."""
