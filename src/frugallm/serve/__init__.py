"""frugallm.serve"""
