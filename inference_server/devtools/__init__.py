"""Tools for developing and testing the system (fault injection, private service instances).
Nothing in production imports them."""
