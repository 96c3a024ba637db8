//! tsh: the user client (login, ssh, ls, status, logout, proxy ssh, config).
