import redis
import json

# Connect to Redis
r = redis.Redis(host='localhost', port=6379, decode_responses=True)
pubsub = r.pubsub()

# Subscribe to topic
TOPIC = "orders"
pubsub.subscribe(TOPIC)

print(f"📧 Email Service listening on '{TOPIC}'...")

for message in pubsub.listen():
    if message['type'] == 'message':
        data = json.loads(message['data'])
        print(f"✅ Received Event: Order #{data['id']} for {data['email']}")
        print(f"   -> Sending confirmation email to {data['email']}...")
