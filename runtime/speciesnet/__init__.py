"""speciesnet"""
