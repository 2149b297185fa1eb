"""frugallm.train"""
