"""Study-level analysis: paired comparison of every metric, prompt-matched drift, leaderboards."""
