"""Web Push (the ``push`` channel kind): browsers' subscriptions and the server's VAPID keys.

- ``models``: ``PushSubscription``, one browser's subscription for one user (imported by
  ``routing_app.models``);
- ``vapid``: the VAPID key pair from settings, its ``applicationServerKey`` form, key
  generation (``manage.py push keys``) and the signed ``Authorization`` header of a request;
- ``subscriptions``: validating what a browser's ``PushSubscription.toJSON()`` sends, subscribing
  and unsubscribing (the API in channels_app/push_api.py is a thin edge over it);
- ``admin``: the subscriptions in the admin.

The transport is ``routing_app/delivery/transports/push.py``; the browser side is
``static/notify/push.js`` and the service worker ``static/notify/notify-sw.js``.
"""
