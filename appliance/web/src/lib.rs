//! QuteMail's HTTP side: the REST API, the webmail and the admin console (work in progress).
