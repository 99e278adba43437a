"""alexnetd.pipeline"""
