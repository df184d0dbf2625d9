"""Provider adapters (entry-point group `mdp.adapters`)."""
