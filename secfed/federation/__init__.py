"""Planning and writing a federation: its PKI (:mod:`.pki`), the enrolment by which each party
makes its own keys (:mod:`.enrol`), the kits on disk (:mod:`.kits`), certificate renewal and
revocation (:mod:`.lifecycle`), and the choice of ring size and CKKS context. The transport
(:mod:`secfed.transport`) only moves bytes between the parties these modules set up.
"""
