"""Small pieces shared by every carrecog service: server bootstrap, settings, plugins."""
