"""Loading the small real models that ship as pip packages (no network needed)."""
