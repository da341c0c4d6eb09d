"""aqlm"""
