"""asx domain: assets, checks, jobs and schedules."""
