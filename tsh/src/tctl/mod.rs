//! tctl: the administrator tool (auth export/sign, users, tokens, devices, locks).
