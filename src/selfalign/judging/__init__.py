"""The self-judge: templates, judging modes, judge tuning and the refusal detector."""
