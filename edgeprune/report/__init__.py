"""What a job leaves behind: report.json and report.md, pruned.pt, model sizes."""
