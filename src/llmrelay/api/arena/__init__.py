"""The web console's side of the API server: votes between two models' answers (store.py), the
leaderboard ranked by Bradley-Terry (rating.py), the operations view's live samples (ops.py),
and their routes (routes.py)."""
