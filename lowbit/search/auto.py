"""placeholder while the auto search is written"""
