"""alexnetd.model"""
