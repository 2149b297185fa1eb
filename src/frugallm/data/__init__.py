"""frugallm.data"""
