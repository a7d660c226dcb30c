"""The preference-data engine: respond, judge, revise, helpful mix, build (see pipeline.py)."""
