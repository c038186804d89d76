"""`+launcher=slurm`: a sweep as a SLURM array that says what SLURM says (fcexp.slurm)."""
