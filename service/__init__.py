"""alexnetd.service"""
