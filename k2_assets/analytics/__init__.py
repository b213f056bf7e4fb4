"""analytics domain: assets, checks, jobs and schedules."""
