"""Health checks proven in the namespace lab (issue: dead gateway behind a live link)."""
