"""trades domain: assets, checks, jobs and schedules."""
