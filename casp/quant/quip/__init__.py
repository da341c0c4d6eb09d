"""quip"""
