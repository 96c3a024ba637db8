#!/usr/bin/python3
"""An SSH client that presents a crafted certificate in public-key authentication.

Usage: ssh-crafted-cert.py PROXY_COMMAND USER CERT_FILE [ALGORITHM]

Connects through PROXY_COMMAND (a shell command, as OpenSSH's ProxyCommand), then asks to authenticate USER
with the raw certificate blob in CERT_FILE under ALGORITHM (default
ssh-ed25519-cert-v01@openssh.com), signed with garbage: no real client can send a certificate
that its own library cannot parse, and this one sends the bytes as they are. Prints one line:
  refused    the server refused the key and kept the connection (what it must do)
  accepted   the server accepted it (a hole)
  dropped: … the connection ended instead (a server that crashed or gave up)
  no answer: … nothing came back within paramiko's authentication timeout (30 s)
Exits 0 in all these cases, non-zero only if the test itself could not run.

Paramiko is used because it lets a key object hand over arbitrary bytes; only its transport
is relied on, never its host-key check (the server's identity is not what is tested here).
"""

import socket
import subprocess
import sys

import paramiko


class CraftedKey(paramiko.PKey):
    """A 'key' whose public blob and algorithm name are whatever the test says."""

    def __init__(self, algorithm, blob):
        self.public_blob = None
        self._algorithm = algorithm
        self._blob = blob

    def get_name(self):
        return self._algorithm

    def asbytes(self):
        return self._blob

    def get_bits(self):
        return 256

    def can_sign(self):
        return True

    def sign_ssh_data(self, data, algorithm=None):
        m = paramiko.Message()
        m.add_string("ssh-ed25519")
        m.add_string(b"\0" * 64)
        return m


def main():
    if len(sys.argv) not in (4, 5):
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    proxy, user, cert_file = sys.argv[1:4]
    algorithm = sys.argv[4] if len(sys.argv) == 5 else "ssh-ed25519-cert-v01@openssh.com"
    with open(cert_file, "rb") as f:
        blob = f.read()
    # The proxy command talks over a socket pair, not paramiko's ProxyCommand: that one
    # never notices its command's end of file, so a closed connection would read as a
    # 30-second authentication timeout.
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen(proxy, shell=True, stdin=theirs, stdout=theirs)
    theirs.close()
    transport = paramiko.Transport(ours)
    transport.start_client(timeout=30)
    try:
        transport.auth_publickey(user, CraftedKey(algorithm, blob))
        print("accepted")
    except paramiko.AuthenticationException as e:
        if "timeout" in str(e).lower():
            print(f"no answer: {e}")
        else:
            # Refused, and the connection must still be there for another attempt.
            print("refused" if transport.is_active() else "dropped: after the refusal")
    except (paramiko.SSHException, EOFError, OSError) as e:
        print(f"dropped: {type(e).__name__}: {e}")
    finally:
        transport.close()
        proc.kill()
        proc.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
